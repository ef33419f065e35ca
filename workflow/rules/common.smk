# Shared set-up: config validation (against workflow/schemas/config.schema.yaml), subjects, and the
# helpers that keep every rule thin. All logic lives in the avatar_pipeline package.
import json
import shlex
import sys

from avatar_pipeline.config import load_subjects, validate_config
from avatar_pipeline.workflow_runner import stage_code_version

validate_config(config, "config (config.yaml and --configfile/--config)")
SUBJECTS = load_subjects(config)
RESULTS = config["results_dir"]
AVATARS = list(config["avatars"])
# the interpreter Snakemake runs in has avatar_pipeline installed; under --sdm conda use the env's python
AP = "python -m avatar_pipeline" if "conda" in str(workflow.deployment_settings.deployment_method) else f'"{sys.executable}" -m avatar_pipeline'


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
