"""DVC stage `synthesize@<name>`: write a synthetic raw dataset in a real layout (real files on disk).

The default profile trains on these so `dvc repro` runs anywhere; the readers that load them are
the same readers that load the real datasets.

    python -m pipelines.synthesize brats2023
"""

from __future__ import annotations

import argparse

from nnmamba.atomic import staged_directory
from nnmamba.data.layouts import get_layout
from pipelines import workspace
from pipelines.params import load_params


def synthesize(name: str) -> list[str]:
    """Regenerate `data/raw/synthetic/<name>` from `synthetic.<name>` in params.yaml."""
    spec = load_params().synthetic[name]
    layout = get_layout(spec.layout)
    out = workspace.path(workspace.SYNTHETIC, name=name)
    with staged_directory(out) as partial:   # the old cases stay until the new ones are all written
        cases = layout.write_synthetic(partial, **spec.options())
    print(f"synthesize: wrote {len(cases)} {layout.name} cases to {out}")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="key under `synthetic` in params.yaml")
    synthesize(parser.parse_args().name)


if __name__ == "__main__":
    main()
