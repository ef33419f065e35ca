"""The stages, in DAG order; each module has `run(store, cfg, ...)`."""

from . import background, crop, landmarks, normals, parsing, qa, tracking

STAGES = {
    "crop": crop,
    "landmarks": landmarks,
    "parsing": parsing,
    "background": background,
    "normals": normals,
    "qa": qa,
    "tracking": tracking,
}
