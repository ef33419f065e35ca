# Reports: one HTML page per subject (preprocessing QA, tracking, every avatar) and an index across
# subjects with the metrics table results/metrics.csv.


rule report:
    input:
        qa=f"{RESULTS}/{{subject}}/qa",
        tracking=f"{RESULTS}/{{subject}}/tracking",
        avatars=expand(f"{RESULTS}/{{{{subject}}}}/avatars/{{avatar}}/eval", avatar=AVATARS),
    output:
        directory(f"{RESULTS}/{{subject}}/report"),
    params:
        avatars=",".join(AVATARS),
        code=code_version("avatar_pipeline.report"),
        results=results_root(1),
    log:
        f"{RESULTS}/{{subject}}/logs/report.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline report --results {params.results:q} --subject {wildcards.subject} --avatars={params.avatars:q} > {log:q} 2>&1"


rule index:
    input:
        expand(f"{RESULTS}/{{subject}}/report", subject=SUBJECTS),
    output:
        f"{RESULTS}/index.html",
        f"{RESULTS}/metrics.csv",
    params:
        subjects=",".join(SUBJECTS),
        avatars=",".join(AVATARS),
        code=code_version("avatar_pipeline.report"),
        results=results_root(0),
    log:
        f"{RESULTS}/_logs/index.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "avatar-pipeline index --results {params.results:q} --subjects {params.subjects:q} --avatars={params.avatars:q} > {log:q} 2>&1"
