"""`ruyi-quant run`: a recipe's jobs, every one checked before the first runs; one after another,
or as Ray tasks (--ray, or the recipe's `ray` key: pipeline/cluster.py)."""

from __future__ import annotations

import sys

from ..errors import UserError
from .options import console


def add_parser(sub) -> None:
    s = sub.add_parser(
        "run",
        help="run the jobs of a recipe YAML",
        description=(
            "Run a recipe's jobs in order. A job whose outputs are complete and unchanged (manifest "
            "with sha256 of every artifact) is skipped. See recipes/README.md for the format."
        ),
    )
    s.add_argument("recipe", metavar="RECIPE")
    s.add_argument("--only", action="append", metavar="JOB", help="run only this job (repeatable)")
    s.add_argument("--force", action="store_true", help="rerun jobs even when complete")
    s.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the jobs as Ray tasks, side by side: on a cluster started here for the run, or on "
        "the one at ADDRESS (auto, HOST:PORT, ray://HOST:PORT); needs pip install 'ruyi-quant[ray]'",
    )
    s.set_defaults(func=run)


def run(args) -> int:
    """Exit code 0 when every job is done or skipped, 1 when a job failed under Ray (serially the
    first failure stops the run: one line, exit code 2)."""
    from ..evaluate import ReferenceCache
    from ..pipeline import run_job
    from ..preflight import check_job
    from ..recipe import RaySettings
    from ..recipe.load import load_recipe
    from ..report import eval_cells, rich_table

    recipe, base = load_recipe(args.recipe)
    jobs = [j for j in recipe.jobs if not args.only or j.name in args.only]
    if args.only and not jobs:
        raise UserError(
            f"--only {','.join(args.only)}: no such job (jobs: {', '.join(j.name for j in recipe.jobs)})"
        )
    ray = recipe.ray
    if args.ray is not None:
        ray = (ray or RaySettings()).model_copy(update={"address": args.ray})
    if ray is not None:
        from ..pipeline.cluster import import_ray

        import_ray()  # not installed: one line before any check
    index = {id(j): i for i, j in enumerate(recipe.jobs)}
    checked = [(index[id(j)], j, *check_job(j, base, index[id(j)], device=ray is None)[:2]) for j in jobs]
    con = console()
    say = lambda m: con.print(m, markup=False)  # noqa: E731

    def table(job, res):
        if res.get("eval"):
            con.print(rich_table(f"{job.name}: {res['method']} vs reference", *eval_cells(res["eval"])))

    if ray is None:
        results = []
        cache = ReferenceCache()  # the reference's side of evaluation, shared by the jobs
        for i, job, _, _ in checked:
            res = run_job(job, base, force=args.force, say=say, index=i, cache=cache)
            results.append((job, res))
            table(job, res)
    else:
        from ..pipeline.cluster import run_on_ray

        by_index = run_on_ray(checked, base, args.force, ray, say)
        results = [(job, by_index[i]) for i, job, _, _ in checked]
        for job, res in results:
            table(job, res)
    rows = [[j.name, r["status"], r["output"], f"{r.get('seconds', 0):.1f}"] for j, r in results]
    con.print(rich_table("jobs", ["job", "status", "output", "seconds"], rows))
    failed = [j.name for j, r in results if r["status"] == "failed"]
    if failed:
        print(
            f"ruyi-quant: error: {len(failed)} of {len(results)} jobs failed: {', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0
