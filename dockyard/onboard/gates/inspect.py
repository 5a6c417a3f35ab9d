"""Gate 1, inspect: the config parses and validates, and says which implementation runs it: a registered
family that implements all it asks, or else transformers' own classes (the generic path, ``dockyard.model_impl``).

When it does not, the evidence names the nearest supported family and every feature of the config
that no implementation covers, read from the raw config (``config_features``), because a config
that needs more than dockyard has is exactly one that ``ModelSpec`` refuses to describe.
"""

from __future__ import annotations

import logging

from dockyard.errors import DockyardError
from dockyard.model_source import resolve_model
from dockyard.onboard.config_features import coverage, detect_features, nearest_family, unrecognised_keys
from dockyard.onboard.context import GateContext, Outcome, read_raw_model
from dockyard.registry import MODEL_REGISTRY, supported_architectures

logger = logging.getLogger(__name__)


def run(ctx: GateContext) -> Outcome:
    ctx.raw = raw = read_raw_model(ctx.options.model, ctx.options.revision, ctx.options.download_dir)
    config = raw.config
    archs = config.get("architectures")
    arch = str(archs[0]) if isinstance(archs, list) and archs else None
    model_type = str(config.get("model_type") or "")
    ctx.features = features = detect_features(config)
    logger.info("model %s (%s at %s): architecture %s, model_type %s", raw.name, raw.kind, raw.path, arch, model_type)
    for f in features:
        logger.info("feature %-28s %s %s", f.key, f.label, f.detail)

    registered = arch in MODEL_REGISTRY
    cov = coverage(features, arch) if registered else nearest_family(features, model_type)
    unknown = unrecognised_keys(config)
    spec_error = None
    try:
        ctx.source = resolve_model(ctx.options.model, "dummy" if ctx.options.weights == "dummy" else "auto",
                                   **ctx.impl_kwargs, **ctx.source_kwargs)
    except DockyardError as exc:
        spec_error = str(exc)
        logger.info("spec does not validate: %s", exc)
    missing = [f.label for f in cov.missing] if cov else []
    covered_keys = {f.key for f in cov.covered} if cov else set()
    evidence = {
        "architecture": arch,
        "model_type": model_type,
        "registered": registered,
        "supported_architectures": supported_architectures(),
        "family": MODEL_REGISTRY[arch].family if registered else None,
        "nearest_family": None if cov is None else {**cov.to_dict(), "shares": len(cov.covered)},
        "features": [{**f.to_dict(), "covered": f.key in covered_keys if f.kind == "arch" else None}
                     for f in features],
        "missing_features": missing,
        "unrecognised_keys": unknown,
        "spec_error": spec_error,
        "spec": ctx.spec.to_dict() if ctx.spec is not None else None,
        "source": {"kind": ctx.source.kind if ctx.source is not None else raw.kind, "path": str(raw.path)},
        # Which implementation runs it and why (dockyard.model_impl): "dockyard" or "transformers" (generic).
        "path": {"impl": ctx.spec.model_impl if ctx.spec is not None else None,
                 "reason": ctx.source.impl_reason if ctx.source is not None else spec_error},
    }
    n_arch = sum(1 for f in features if f.kind == "arch")
    if ctx.spec is not None and ctx.spec.model_impl == "transformers":
        native = f"; a native family would need: {', '.join(missing)}" if missing else ""
        return Outcome("pass", f"{arch} → {ctx.source.impl_reason}{native}", evidence)
    if registered and spec_error is None and not missing and not unknown:
        return Outcome("pass", f"{arch} → family '{evidence['family']}'; all {n_arch} architectural features "
                               f"covered", evidence)
    parts = []
    if not registered:
        what = f"architecture {arch!r}" if arch else "config has no 'architectures' list;"
        near = f"nearest supported family: {cov.family} ({', '.join(cov.architectures)})" if cov else ""
        parts.append(f"{what} is not supported; {near}" if arch else f"{what} {near}")
        if cov is not None and not missing and arch:
            parts.append(f"no architectural feature is missing, but no family maps {arch}'s checkpoint layout "
                         "(module names, fused tensors) onto its modules; a registry entry with a name map is needed")
    if missing:
        parts.append("missing: " + ", ".join(missing))
    if unknown:
        parts.append(f"unrecognised config keys: {', '.join(unknown)} (dockyard cannot tell whether they change the "
                     "computation, so no native family is claimed; add each to the spec reader or to "
                     "config_features' keys that do not affect compute)")
    if spec_error and (registered or not missing):
        parts.append(f"config does not validate: {spec_error}")
    elif spec_error:
        parts.append(f"the generic path cannot run it either: {spec_error}")
    return Outcome("fail", "; ".join(parts), evidence)
