# Preprocessing DAG, per subject:
#   crop -> landmarks -> parsing -> background (from the parsing matte, or a plate) ; landmarks -> normals
#   everything -> qa
# Each rule calls one stage of avatar_pipeline and writes one folder, atomically.


rule crop:
    input:
        video=subject_video,
    output:
        directory(f"{RESULTS}/{{subject}}/crop"),
    params:
        settings=lambda w: stage_settings("crop"),
        split=subject_split_args,
        code=stage_code_version("crop"),
        results=results_root(1),
    log:
        f"{RESULTS}/{{subject}}/logs/crop.log",
    threads: 2
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline crop --results {params.results:q} --subject {wildcards.subject} --video {input.video:q}"
        " --settings {params.settings:q} {params.split} > {log:q} 2>&1"


rule landmarks:
    input:
        rules.crop.output,
    output:
        directory(f"{RESULTS}/{{subject}}/landmarks"),
    params:
        settings=lambda w: stage_settings("landmarks"),
        code=stage_code_version("landmarks"),
        results=results_root(1),
    log:
        f"{RESULTS}/{{subject}}/logs/landmarks.log",
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline landmarks --results {params.results:q} --subject {wildcards.subject}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule parsing:
    input:
        rules.crop.output,
        rules.landmarks.output,
    output:
        directory(f"{RESULTS}/{{subject}}/parsing"),
    params:
        settings=lambda w: stage_settings("parsing"),
        code=stage_code_version("parsing"),
        results=results_root(1),
    log:
        f"{RESULTS}/{{subject}}/logs/parsing.log",
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline parsing --results {params.results:q} --subject {wildcards.subject}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule background:
    input:
        unpack(background_inputs),
    output:
        directory(f"{RESULTS}/{{subject}}/background"),
    params:
        settings=lambda w: stage_settings("background"),
        plate=lambda w, input: f"--plate {shlex.quote(input.plate)}" if "plate" in input.keys() else "",
        code=stage_code_version("background"),
        results=results_root(1),
    log:
        f"{RESULTS}/{{subject}}/logs/background.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline background --results {params.results:q} --subject {wildcards.subject}"
        " --settings {params.settings:q} {params.plate} > {log:q} 2>&1"


rule normals:
    input:
        rules.crop.output,
        rules.landmarks.output,
    output:
        directory(f"{RESULTS}/{{subject}}/normals"),
    params:
        settings=lambda w: stage_settings("normals"),
        code=stage_code_version("normals"),
        results=results_root(1),
    log:
        f"{RESULTS}/{{subject}}/logs/normals.log",
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline normals --results {params.results:q} --subject {wildcards.subject}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule qa:
    input:
        rules.crop.output,
        rules.landmarks.output,
        rules.parsing.output,
        rules.background.output,
        rules.normals.output,
    output:
        directory(f"{RESULTS}/{{subject}}/qa"),
    params:
        settings=lambda w: stage_settings("qa"),
        code=stage_code_version("qa"),
        results=results_root(1),
    log:
        f"{RESULTS}/{{subject}}/logs/qa.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline qa --results {params.results:q} --subject {wildcards.subject}"
        " --settings {params.settings:q} > {log:q} 2>&1"
