"""The baseline: the framework as published, no hooks. Every other arm is compared with it."""

from __future__ import annotations

from stc_bench.methods.method import COMPRESS, TOWER, Arm, HookSite, MethodSpec, MethodStream


def _stream(arm: Arm, site: HookSite) -> MethodStream:
    return MethodStream()


METHOD = MethodSpec(
    name="baseline",
    summary="the framework as published: no compression",
    knobs=(),
    hooks=frozenset({TOWER, COMPRESS}),
    stream=_stream,
)
