"""``sdinfer models``: the shipped models, their class, size and folder."""

from __future__ import annotations

from .options import quiet_libraries


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=run)


def run(args) -> int:
    from ..models.loading import DEFAULT_MODELS, load_model

    quiet_libraries()
    print(f"{'name':<8} {'class':<26} {'parameters':>11} {'on disk':>9}  path")
    for name, path in DEFAULT_MODELS.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        model = load_model(name)
        alias = " (default)" if name == "unet" else ""
        print(f"{name:<8} {model.family:<26} {model.num_parameters():>11,} "
              f"{size / 2**20:>7.1f} MB  {path}{alias}")
    return 0
