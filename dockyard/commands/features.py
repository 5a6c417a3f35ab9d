"""What a model's config asks for, read from metadata alone (torch-free): the features, the closest registered
family and the keys nobody reads. ``dockyard inspect`` prints them, also before refusing a config
(``dockyard.cli.precheck``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from dockyard.onboard.config_features import detect_features, nearest_family, unrecognised_keys
from dockyard.onboard.context import read_raw_model


@dataclass(frozen=True)
class ConfigFeatures:
    """A config's architectural features, the nearest family (or None) and its unrecognised keys."""

    features: list[Any]
    near: Any
    unknown: list[str]


def read_features(args: argparse.Namespace) -> ConfigFeatures:
    """The features of MODEL's config (``args.model``, at ``args.revision`` in ``args.download_dir``)."""
    config = read_raw_model(args.model, args.revision, args.download_dir).config
    features = detect_features(config)
    return ConfigFeatures(features, nearest_family(features, str(config.get("model_type") or "")),
                          unrecognised_keys(config))


def print_features(found: ConfigFeatures) -> None:
    """The architectural features the config asks for, the closest registered family and the keys nobody reads."""
    features, near, unknown = found.features, found.near, found.unknown
    print("features     " + ", ".join(f.key for f in features if f.kind == "arch"))
    if near is not None:
        missing = ", ".join(f.label for f in near.missing) or "none"
        print(f"family       {near.family} ({', '.join(near.architectures)}): {len(near.covered)} features covered; "
              f"missing: {missing}")
    note = "  (no native family verdict: dockyard cannot tell what they do)" if unknown else ""
    print("unrecognised " + (", ".join(unknown) if unknown else "none") + note)


def show_refusal(found: ConfigFeatures, as_json: bool, error: Exception) -> None:
    """What the config asks for, shown before a refusal: as text (the error follows on stderr), or, under
    ``--json``, one JSON object with the error so a script reading stdout is not left with nothing."""
    if not as_json:
        print_features(found)
        return
    json.dump({"error": {"type": type(error).__name__, "message": str(error)},
               "features": [f.to_dict() for f in found.features],
               "nearest_family": found.near.to_dict() if found.near else None,
               "unrecognised_keys": found.unknown}, sys.stdout, indent=2)
    sys.stdout.write("\n")
