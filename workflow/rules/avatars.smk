# Avatars: every entry of the config's `avatars` (name -> method + preset + overrides) trains into
# results/{subject}/avatars/{avatar}/ from the subject's one set of preprocessing and tracking caches;
# training's inputs are the caches its method declares (avatar_pipeline/avatars, MethodSpec.needs).
# Training reruns when the avatar's training settings or code change; evaluation when any of its settings
# change. The checkpoint is not a declared output, so a killed training job resumes from it on rerun.


rule avatar_train:
    input:
        unpack(avatar_training_inputs),
    output:
        f"{RESULTS}/{{subject}}/avatars/{{avatar}}/train/done.json",
    params:
        settings=avatar_training_settings,
        code=avatar_code("train"),
        results=results_root(4),
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
        "avatar-pipeline avatar-train --results {params.results:q} --subject {wildcards.subject} --avatar {wildcards.avatar}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule avatar_eval:
    input:
        unpack(reenactment_driver),
        trained=rules.avatar_train.output[0],
        # the evaluation of every method reads the frames, plate, cameras and the parsed head masks
        crop=f"{RESULTS}/{{subject}}/crop",
        background=f"{RESULTS}/{{subject}}/background",
        tracking=f"{RESULTS}/{{subject}}/tracking",
        parsing=f"{RESULTS}/{{subject}}/parsing",
    output:
        directory(f"{RESULTS}/{{subject}}/avatars/{{avatar}}/eval"),
    params:
        settings=lambda w: json.dumps(avatar_section(w), sort_keys=True),
        code=avatar_code("eval"),
        driver=lambda w: f"--driver {avatar_section(w)['reenact_from']}" if avatar_section(w).get("reenact_from") else "",
        results=results_root(3),
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
        "avatar-pipeline avatar-eval --results {params.results:q} --subject {wildcards.subject} --avatar {wildcards.avatar}"
        " --settings {params.settings:q} {params.driver} > {log:q} 2>&1"
