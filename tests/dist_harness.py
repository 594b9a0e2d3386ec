"""Run a test function on N CPU/gloo ranks through the project's launcher (support.launch).

``run_distributed(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` on every rank
and returns the list of results; any worker exception, signal or timeout fails the test with
the worker's traceback (never a hang, never a swallowed error).
"""
from support.launch import WorkerFailed, launch


def _call(ctx, fn, args):
    return fn(ctx.rank, ctx.world_size, *args)


def run_distributed(fn, world_size, *args, timeout=120):
    try:
        return launch(_call, (fn, args), nprocs=world_size, backend="gloo", port=0, threads=1,
                      timeout_s=timeout)
    except WorkerFailed as exc:
        raise RuntimeError(f"distributed run failed: {exc.message}\n{exc.details}") from None
