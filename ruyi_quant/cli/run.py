"""`ruyi-quant run`: a recipe's jobs, every one checked before the first runs."""

from __future__ import annotations

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
    s.set_defaults(func=run)


def run(args) -> None:
    from ..evaluate import ReferenceCache
    from ..pipeline import run_job
    from ..preflight import check_job
    from ..recipe import load_recipe
    from ..report import eval_cells, rich_table

    recipe, base = load_recipe(args.recipe)
    jobs = [j for j in recipe.jobs if not args.only or j.name in args.only]
    if args.only and not jobs:
        raise UserError(
            f"--only {','.join(args.only)}: no such job (jobs: {', '.join(j.name for j in recipe.jobs)})"
        )
    index = {id(j): i for i, j in enumerate(recipe.jobs)}
    for job in jobs:  # every job checked before the first runs
        check_job(job, base, index[id(job)])
    con = console()
    results = []
    cache = ReferenceCache()  # the reference's side of evaluation, shared by the jobs
    for job in jobs:
        say = lambda m: con.print(m, markup=False)  # noqa: E731
        res = run_job(job, base, force=args.force, say=say, index=index[id(job)], cache=cache)
        results.append((job, res))
        if res.get("eval"):
            con.print(rich_table(f"{job.name}: {res['method']} vs reference", *eval_cells(res["eval"])))
    rows = [[j.name, r["status"], r["output"], f"{r.get('seconds', 0):.1f}"] for j, r in results]
    con.print(rich_table("jobs", ["job", "status", "output", "seconds"], rows))
