"""Errors a user can act on: each names the input at fault and what to do about it."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for every error this package raises on purpose."""


class InputError(PipelineError):
    """A user-supplied input (video, image, config, model file) cannot be used.

    The message always names the input and the fix, so the CLI prints it without a traceback.
    """

    def __init__(self, what: str, problem: str, fix: str):
        self.what, self.problem, self.fix = what, problem, fix
        super().__init__(f"{what}: {problem}\n  fix: {fix}")


class CacheError(PipelineError):
    """A per-subject cache file is missing, truncated or inconsistent with its stage."""

    def __init__(self, path, problem: str, rule: str):
        self.path, self.problem, self.rule = path, problem, rule
        super().__init__(
            f"{path}: {problem}\n  fix: delete it and rerun; the Snakemake rule '{rule}' rebuilds it "
            f"(or run with --forcerun {rule})"
        )
