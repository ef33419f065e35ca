# Shared set-up: config validation (against workflow/schemas/config.schema.yaml), subjects, and the
# helpers that keep every rule thin. All logic lives in the avatar_pipeline package.
import json
import shlex
from pathlib import Path

from avatar_pipeline.config import load_subjects, validate_config
from avatar_pipeline.workflow_runner import code_version, put_this_environment_first_on_path, stage_code_version

validate_config(config, "config (config.yaml and --configfile/--config)")
SUBJECTS = load_subjects(config)
RESULTS = config["results_dir"]
AVATARS = list(config["avatars"])
# rules call the `avatar-pipeline` command of the environment Snakemake runs in (or, under --sdm conda,
# of the rule's environment, which conda puts first on PATH)
put_this_environment_first_on_path()


wildcard_constraints:
    subject="[A-Za-z0-9][A-Za-z0-9_.-]*",
    avatar="[A-Za-z0-9][A-Za-z0-9_-]*",


def stage_settings(stage):
    """Exactly the stage's config section, so editing it reruns this stage and what depends on it."""
    return json.dumps(config[stage], sort_keys=True)


def subject_video(wildcards):
    return SUBJECTS[wildcards.subject].video


def subject_split_args(wildcards):
    """Explicit train/val/test frame ranges of the subject, as crop arguments."""
    subject = SUBJECTS[wildcards.subject]
    ranges = {k: getattr(subject, k) for k in ("train", "val", "test")}
    return " ".join(f"--{k} {r[0]}-{r[1]}" for k, r in ranges.items() if r)


def results_root(levels):
    """The results folder, taken from a rule's first output `levels` folders up rather than hard-coded."""
    return lambda wildcards, output: str(Path(output[0]).parents[levels])


def background_inputs(wildcards):
    """A plate needs only the crop window; an estimate needs the person matte too."""
    plate = SUBJECTS[wildcards.subject].background
    inputs = {"crop": f"{RESULTS}/{wildcards.subject}/crop"}
    if plate:
        inputs["plate"] = plate
    else:
        inputs["parsing"] = f"{RESULTS}/{wildcards.subject}/parsing"
    return inputs


def tracking_inputs(wildcards):
    inputs = {"crop": f"{RESULTS}/{wildcards.subject}/crop", "landmarks": f"{RESULTS}/{wildcards.subject}/landmarks"}
    if config["model"]["kind"] in ("auto", "ict"):
        inputs["ict"] = rules.ict_model.output[0]
    if config["tracking"]["refine"] == "photometric":  # frames and parsed face masks
        inputs["parsing"] = f"{RESULTS}/{wildcards.subject}/parsing"
    return inputs


def avatar_section(wildcards):
    return config["avatars"][wildcards.avatar]


def avatar_spec(wildcards):
    from avatar_pipeline.avatars import avatar_method

    return avatar_method(avatar_section(wildcards))


def avatar_training_inputs(wildcards):
    """The caches the avatar's method declares it reads (MethodSpec.needs), so editing one retrains."""
    spec, _ = avatar_spec(wildcards)
    return {stage: f"{RESULTS}/{wildcards.subject}/{stage}" for stage in spec.needs}


def avatar_training_settings(wildcards):
    """Only the keys that change the trained model, so evaluation-only edits do not retrain."""
    spec, cfg = avatar_spec(wildcards)
    return json.dumps({"method": spec.name, **cfg.training_settings()}, sort_keys=True)


def avatar_code(part):
    """Version of the code a method's training or evaluation runs (a param: editing it reruns the rule)."""
    def version(wildcards):
        spec, _ = avatar_spec(wildcards)
        return code_version(spec.model_module, f"avatar_pipeline.avatars.{'trainer' if part == 'train' else 'evaluation'}")

    return version


def reenactment_driver(wildcards):
    driver = avatar_section(wildcards).get("reenact_from")
    return {"driver": f"{RESULTS}/{driver}/tracking"} if driver else {}
