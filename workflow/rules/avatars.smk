# Avatars (work in progress): NeRFace training and test-frame evaluation. Not part of the default
# target yet; ask for results/{subject}/nerface/test_metrics.json. The checkpoint is not a declared
# output, so a killed training job keeps it and the rerun resumes from it.
import avatar_pipeline.avatars.train_nerface as nerface_module


rule nerface_train:
    input:
        crop=f"{RESULTS}/{{subject}}/crop",
        background=f"{RESULTS}/{{subject}}/background",
        tracking=f"{RESULTS}/{{subject}}/tracking",
    output:
        f"{RESULTS}/{{subject}}/nerface/done.json",
    params:
        settings=lambda w: stage_settings("nerface"),
        code=stage_code_version("nerface", nerface_module),
        results=RESULTS,
    log:
        f"{RESULTS}/{{subject}}/logs/nerface_train.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=720,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "{AP} nerface-train --results {params.results:q} --subject {wildcards.subject}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule nerface_eval:
    input:
        rules.nerface_train.output,
    output:
        f"{RESULTS}/{{subject}}/nerface/test_metrics.json",
    params:
        settings=lambda w: stage_settings("nerface"),
        code=stage_code_version("nerface", nerface_module),
        results=RESULTS,
    log:
        f"{RESULTS}/{{subject}}/logs/nerface_eval.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "{AP} nerface-eval --results {params.results:q} --subject {wildcards.subject}"
        " --settings {params.settings:q} > {log:q} 2>&1"
