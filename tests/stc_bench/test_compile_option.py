"""--compile end to end: the run completes and its results say which arm was compiled (``slow``:
compilation takes seconds; CI runs it)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_a_compiled_run_writes_its_knob_into_the_results(cli, tmp_path):
    result = cli("rekv", "--scale", "tiny", "--frames", "4", "--repeats", "1", "--warmup", "0", "--compile",
                 "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    (results,) = tmp_path.glob("*/results.json")
    arms = [arm["arm"] for arm in json.loads(results.read_text())["arms"]]
    assert {"method": "stc", "knobs": {"ratio": 0.25, "interval": 2, "tokens_per_frame": 64, "metric": "cosine",
                                       "selection": "shared", "cuda_graph": False, "compile": True}} in arms
