# avatar-pipeline: raw monocular portrait video -> preprocessing caches -> tracking -> avatars -> report.
# Run through `avatar-pipeline run VIDEO`, `avatar-pipeline workflow`, or directly:
#   snakemake --cores all --configfile config.yaml
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/avatars.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{RESULTS}/index.html",
    default_target: True
