"""``haba-fast table``: the results table (every baseline against HaBa at equal storage), resumable cell by cell.

``haba-fast table --dataset fashion-mnist --out runs/table`` computes every cell of ``--ipc`` × ``--rows`` not
already stored under ``--out`` (one JSON per finished cell), then writes the document (``--doc``), the JSON of
every cell (``--cells-json``) and PNG grids of the synthetic sets (``--images``). A killed run continues where it
stopped. ``--jobs 2`` computes two cells at once (one process each; on a 2-core machine with ``--threads 1``).
``--eval-split val`` evaluates on the held-out validation images instead (for tuning; those cells are
stored apart and never reach the document). The logic lives in ``haba_fast.table``.
"""

from __future__ import annotations


def register(sub) -> None:
    from haba_fast.table import PROTOCOLS, ROWS

    p = sub.add_parser("table", help="the results table: baselines vs HaBa at equal storage (resumable)",
                       description=__doc__)
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name (default fashion-mnist)")
    p.add_argument("--data-path", default=None, help="dataset folder (default: the dataset's own)")
    p.add_argument("--out", default="runs/table", help="work folder: cells, distillation runs, experts")
    p.add_argument("--protocol", default="quick", choices=sorted(PROTOCOLS), help="evaluation/distillation sizes")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10], help="storage budgets (images per class)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                   help=f"rows to compute (default all): {', '.join(ROWS)}")
    p.add_argument("--eval-split", default="test", choices=("test", "val"),
                   help="test: the table; val: the validation split, for tuning (not written to the document)")
    p.add_argument("--no-cross", action="store_true", help="skip the cross-architecture cells")
    p.add_argument("--cross-models", nargs="+", default=None, metavar="MODEL",
                   help="compute only these architectures' cross-architecture cells (default: all of the "
                        "protocol's), e.g. to split them between two runs on one work folder")
    p.add_argument("--render-only", action="store_true",
                   help="compute nothing: rewrite the document and the JSON from the cells already stored")
    p.add_argument("--no-longer", action="store_true",
                   help="skip the one cell rerun under a longer protocol (the cost of the reduced protocol)")
    p.add_argument("--doc", default="docs/RESULTS-{dataset}{tag}.md",
                   help="markdown document to write ({tag}: '' for the quick protocol without --haba-set, else "
                        "-<protocol>[-<settings>], so that no run replaces another protocol's table)")
    p.add_argument("--cells-json", default="bench/results/{dataset_}{tag}_cells.json", help="JSON of every cell")
    p.add_argument("--images", default="docs/images/{dataset}{tag}", help="folder for the PNG grids")
    p.add_argument("--haba-set", nargs="+", default=[], metavar="OBJ:KEY=VALUE",
                   help="HaBa setting for one objective's HaBa cells, e.g. dm:lr_img=10 dm:n_hallucinators=2 "
                        "(tune with --eval-split val; its cells and runs are stored apart per setting)")
    p.add_argument("--tuning-json", default="bench/results/{dataset_}_tuning.json",
                   help="log of every validation-split trial (written by --eval-split val, listed in the document)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the experts, distillations and evaluation networks (default 0; the split keeps its "
                        "own): another seed is a replicate, stored apart as protocol <protocol>-seed<N>")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 leaves torch's)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells computed at once, each in its own process with --threads threads (default 1; "
                        "2 on a 2-core machine: --jobs 2 --threads 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from haba_fast.table import PROTOCOLS, parse_haba_set, protocol_tag, run_table

    protocol = PROTOCOLS[args.protocol].with_seed(args.seed)
    for text in args.haba_set:
        objective, key, value = parse_haba_set(text)
        protocol = protocol.with_haba(objective, **{key: value})
        if key == "lr_style" and value == dict(protocol.lr_style).get(objective):
            print(f"note: --haba-set {text}: {value:g} is the {args.protocol} protocol's own lr_style for "
                  f"{objective}; the protocol's cells and files are used", file=sys.stderr)
    names = {"dataset": args.dataset, "dataset_": args.dataset.replace("-", "_"), "tag": protocol_tag(protocol)}
    run_table(
        args.dataset,
        Path(args.out),
        protocol=protocol,
        ipcs=sorted(set(args.ipc)),
        rows=args.rows,
        eval_split=args.eval_split,
        cross=not args.no_cross,
        cross_models=args.cross_models,
        longer_check=not args.no_longer,
        render_only=args.render_only,
        doc=Path(args.doc.format(**names)),
        cells_json=Path(args.cells_json.format(**names)),
        images_dir=Path(args.images.format(**names)),
        tuning_json=Path(args.tuning_json.format(**names)),
        data_root=args.data_path,
        threads=args.threads or None,
        jobs=args.jobs,
        log=lambda m: print(m, flush=True),
    )
    return 0
