"""`revpers batch`: anonymize image collections on Ray Data (optional extra ``revpers[batch]``).

``add_batch_parser`` and ``run_batch`` (``revpers.batch.cli``) are all the command line needs; they
import no Ray. ``run``, ``workers``, ``inputs`` and ``tables`` import Ray and pyarrow and are
imported when a batch runs.
"""


def __getattr__(name):  # lazy: the Ray workers import this package without the command line
    if name in ("add_batch_parser", "run_batch"):
        from revpers.batch import cli

        return getattr(cli, name)
    raise AttributeError(name)


__all__ = ["add_batch_parser", "run_batch"]
