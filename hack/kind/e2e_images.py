#!/usr/bin/env python3
"""The images `make e2e` loads into kind, built without a registry or Docker (hack/images), as OCI
archives for `kind load image-archive`:

* ``agent.tar``, ``operator.tar``: hack/images/python_images.py with the tag TAG (no GPU extras: kind
  has no GPU);
* ``placeholder.tar``: the placeholder of a stand-in runtime whose entrypoint is the CPU counter worker
  (the devcluster's placeholder recipe: snapshot-init as entrypoint, the worker as its command), named
  as hack/kind/checkpoint.yaml and restore.yaml run it.

Usage: e2e_images.py OUT_DIR [--tag e2e]   (prints the archives, one a line)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDER = "dynamo-snapshot-e2e-placeholder"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tag", default="e2e")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from dynamo_snapshot.devcluster import images

    b, python_images = images.builder(), images.python_builder()
    archives = list(python_images.build(args.out_dir, tag=args.tag).values())
    worker = REPO / "dynamo_snapshot" / "devcluster" / "counter_worker.py"
    app = b.app_layer(args.out_dir / "placeholder-app-layer.tar", {images.WORKER_PATH: worker})
    archives.append(b.oci_archive(args.out_dir / "placeholder.tar", f"docker.io/library/{PLACEHOLDER}:{args.tag}",
                                  [b.base_layer(), app], entrypoint=["/usr/local/bin/snapshot-init", "--"],
                                  cmd=images.WORKER_COMMAND))
    (args.out_dir / "placeholder-app-layer.tar").unlink()
    for archive in archives:
        print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
