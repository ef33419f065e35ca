# avatar-pipeline: raw monocular portrait video -> per-subject preprocessing caches -> (later) avatar.
# Run through `avatar-pipeline run VIDEO`, `avatar-pipeline workflow`, or directly:
#   snakemake --cores all --configfile config.yaml
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/avatars.smk"


rule all:
    input:
        expand(f"{RESULTS}/{{subject}}/qa", subject=SUBJECTS),
        expand(f"{RESULTS}/{{subject}}/tracking", subject=SUBJECTS),
    default_target: True
