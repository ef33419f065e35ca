# Morphable model and tracking. ICT FaceKit is fetched (or read from model.ict_path) and converted once
# for all subjects; with model.kind: auto an unavailable ICT is recorded, and tracking falls back to the
# built-in model with a warning in its log, meta.json and report.


rule ict_model:
    output:
        f"{RESULTS}/_models/ict.json",
    params:
        model=lambda w: stage_settings("model"),
        code=code_version("avatar_pipeline.models"),
        out=results_root(0),
    log:
        f"{RESULTS}/_models/ict_model.log",
    threads: 1
    resources:
        mem_mb=6000,
        runtime=30,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline ict-model --out {params.out:q} --model-settings {params.model:q} > {log:q} 2>&1"


rule tracking:
    input:
        unpack(tracking_inputs),
    output:
        directory(f"{RESULTS}/{{subject}}/tracking"),
    params:
        settings=lambda w: stage_settings("tracking"),
        model=lambda w: stage_settings("model"),
        ict=lambda w, input: f"--ict-status {shlex.quote(input.ict)}" if "ict" in input.keys() else "",
        code=stage_code_version("tracking"),
        results=results_root(1),
    log:
        f"{RESULTS}/{{subject}}/logs/tracking.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline tracking --results {params.results:q} --subject {wildcards.subject}"
        " --settings {params.settings:q} --model-settings {params.model:q} {params.ict} > {log:q} 2>&1"
