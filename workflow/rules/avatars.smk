# Avatars: every entry of the config's `avatars` (name -> method + preset + overrides) trains into
# results/{subject}/avatars/{avatar}/ from the subject's one set of preprocessing and tracking caches.
# Training reruns when the avatar's training settings or code change; evaluation when any of its settings
# change. The checkpoint is not a declared output, so a killed training job resumes from it on rerun.


def avatar_section(wildcards):
    return config["avatars"][wildcards.avatar]


def avatar_training_settings(wildcards):
    """Only the keys that change the trained model, so evaluation-only edits do not retrain."""
    from avatar_pipeline.avatars import avatar_method

    _, cfg = avatar_method(avatar_section(wildcards))
    return json.dumps({"method": avatar_section(wildcards).get("method", "nerface"), **cfg.training_settings()}, sort_keys=True)


def avatar_code(part):
    """Hash of the method's training or evaluation code (a param: editing the code reruns the rule)."""
    import importlib

    from avatar_pipeline.avatars import METHODS

    def version(wildcards):
        method = METHODS[avatar_section(wildcards).get("method", "nerface")]()
        return stage_code_version(part, importlib.import_module(getattr(method, f"{part}_module")))
    return version


def reenactment_driver(wildcards):
    driver = avatar_section(wildcards).get("reenact_from")
    return {"driver": f"{RESULTS}/{driver}/tracking"} if driver else {}


rule avatar_train:
    input:
        crop=f"{RESULTS}/{{subject}}/crop",
        background=f"{RESULTS}/{{subject}}/background",
        tracking=f"{RESULTS}/{{subject}}/tracking",
    output:
        f"{RESULTS}/{{subject}}/avatars/{{avatar}}/train/done.json",
    params:
        settings=avatar_training_settings,
        code=avatar_code("train"),
        results=RESULTS,
    log:
        f"{RESULTS}/{{subject}}/logs/avatar_train_{{avatar}}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=720,
        gpu=config["training_gpus"],  # the SLURM executor turns this into --gpus; 0 on CPU-only clusters
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "{AP} avatar-train --results {params.results:q} --subject {wildcards.subject} --avatar {wildcards.avatar}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule avatar_eval:
    input:
        unpack(reenactment_driver),
        trained=rules.avatar_train.output[0],
        parsing=f"{RESULTS}/{{subject}}/parsing",
    output:
        directory(f"{RESULTS}/{{subject}}/avatars/{{avatar}}/eval"),
    params:
        settings=lambda w: json.dumps(avatar_section(w), sort_keys=True),
        code=avatar_code("eval"),
        driver=lambda w: f"--driver {avatar_section(w)['reenact_from']}" if avatar_section(w).get("reenact_from") else "",
        results=RESULTS,
    log:
        f"{RESULTS}/{{subject}}/logs/avatar_eval_{{avatar}}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
        gpu=config["training_gpus"],
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "{AP} avatar-eval --results {params.results:q} --subject {wildcards.subject} --avatar {wildcards.avatar}"
        " --settings {params.settings:q} {params.driver} > {log:q} 2>&1"
