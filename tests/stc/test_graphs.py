"""Copy-free graph replay, checked on CPU with the emulated backend.

``EmulatedGraphBackend`` re-runs a captured forward on the same fixed buffers and overwrites the
same output tensors, as a CUDA graph does; so every way the address bookkeeping can go wrong (a
stale reference slot, a clobbered output, a copy where an input should be read in place) shows
here as a wrong output or a wrong count, without a GPU.
"""

import pytest
import torch

import stc
from stc import CacherConfig
from stc.cacher.graph import EmulatedGraphBackend, SelectiveGraphs
from stc.integrations import find_vision_layers, hf_vit
from tests.conftest import build_tiny_tower, noisy_clip
from tests.stc.test_cacher import _Fault, _raise_fault

pytestmark = pytest.mark.tier1

STREAM = CacherConfig(update_ratio=0.25, cache_interval=2)
GRAPHED = CacherConfig(update_ratio=0.25, cache_interval=2, cuda_graph=True)


def emulated(tower) -> SelectiveGraphs:
    """Give ``tower`` graphs that replay on CPU (what attach would make on a GPU)."""
    graphs = SelectiveGraphs(EmulatedGraphBackend())
    hf_vit._TOWER_GRAPHS[tower] = graphs
    return graphs


def frame_by_frame(tower, clip, config, mode=torch.inference_mode):
    """Each frame in its own call; the tower outputs kept across calls, as a caller would."""
    with stc.cacher_attached(tower, config), mode():
        return torch.cat([tower(pixel_values=clip[i : i + 1]).last_hidden_state for i in range(clip.shape[0])])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_replayed_streams_equal_eager_bit_for_bit_and_capture_two_graphs_per_layer_once(kind):
    tower, clip = build_tiny_tower(kind), noisy_clip(9)
    layers = len(find_vision_layers(tower)[1])
    eager = frame_by_frame(tower, clip, STREAM)
    graphs = emulated(tower)
    first = frame_by_frame(tower, clip, GRAPHED)
    after_first = graphs.stats
    # A second stream, through a new attach and under no_grad: nothing new is captured.
    second = frame_by_frame(tower, clip, GRAPHED, torch.no_grad)
    assert torch.equal(first, eager) and torch.equal(second, eager)  # CLIP's output is its last layer's
    assert after_first.captures == 2 * layers                        # one graph per reference slot
    assert graphs.stats.captures == after_first.captures
    assert graphs.stats.replays == 2 * 4 * layers and graphs.stats.eager_calls == 0   # 4 selective frames each


def test_references_and_chained_inputs_are_read_in_place():
    """Only layer 0's input (the embeddings, a new tensor each call) is copied into a graph;
    every later layer reads the previous graph's output, layer 0's token index and its
    reference slot where they are."""
    tower, clip = build_tiny_tower("siglip", num_hidden_layers=3), noisy_clip(6)
    graphs = emulated(tower)
    frame_by_frame(tower, clip, GRAPHED)
    copied = {key[0][0]: [buffer is not None for buffer in captured.copies] for key, captured in graphs._captured.items()}
    assert copied == {0: [True, False, False, False, False], 1: [False] * 6, 2: [False] * 6}


def test_a_refresh_that_fails_part_way_leaves_the_slot_the_stream_reads():
    """A refresh writes the slot the stream is not reading, so rolling back a failed call finds
    the old references intact."""
    tower, clip = build_tiny_tower("clip", num_hidden_layers=4), noisy_clip(8, seed=3)
    layers = find_vision_layers(tower)[1]
    eager = frame_by_frame(tower, clip, STREAM)
    emulated(tower)
    with stc.cacher_attached(tower, GRAPHED), torch.inference_mode():
        outputs = [tower(pixel_values=clip[i : i + 1]).last_hidden_state for i in range(4)]
        layers[2].mlp.forward = _raise_fault                 # frame 4 refreshes and fails in layer 2
        try:
            with pytest.raises(_Fault):
                tower(pixel_values=clip[4:5])
        finally:
            del layers[2].mlp.forward
        outputs += [tower(pixel_values=clip[i : i + 1]).last_hidden_state for i in range(4, 8)]
    assert torch.equal(torch.cat(outputs), eager)


def test_graph_stats_say_why_graphs_are_off_on_cpu():
    tower, clip = build_tiny_tower("siglip"), noisy_clip(4)
    with stc.cacher_attached(tower, GRAPHED) as handle, torch.inference_mode():
        tower(pixel_values=clip[:1])
        tower(pixel_values=clip[1:2])
    assert handle.graph_stats.disabled_reason.startswith("tensors are on cpu")


def test_a_call_whose_refresh_frame_follows_frames_reading_the_stored_reference():
    """Frames 3 (selective, reading frame 2's stored reference) and 4 (a refresh) in one call:
    frame 4's reference goes into the other slot, so frame 3 still reads frame 2's."""
    tower, clip = build_tiny_tower("siglip", num_hidden_layers=3), noisy_clip(8, seed=5)
    calls = [(0, 1), (1, 2), (2, 3), (3, 5), (5, 6), (6, 8)]

    def run(config):
        with stc.cacher_attached(tower, config), torch.inference_mode():
            return torch.cat([tower(pixel_values=clip[a:b]).last_hidden_state for a, b in calls])

    eager = run(STREAM)
    emulated(tower)
    assert torch.equal(run(GRAPHED), eager)


def test_a_rollback_across_two_refresh_calls_refreshes_instead_of_reading_rewritten_slots():
    """A checkpoint held across several tower calls (a whole model's video entry may call the
    tower more than once): after two refresh calls both slots hold later frames, so restoring the
    checkpoint's pointers would read them; the stream drops its references and refreshes."""
    tower, clip = build_tiny_tower("siglip", num_hidden_layers=2), noisy_clip(8)
    emulated(tower)
    with stc.cacher_attached(tower, GRAPHED) as handle, torch.inference_mode():
        state = handle._state
        for i in range(3):                                   # frames 0 (refresh), 1, 2 (refresh)
            tower(pixel_values=clip[i : i + 1])
        checkpoint = state.checkpoint()
        tower(pixel_values=clip[3:4])
        tower(pixel_values=clip[4:5])                        # one refresh call: frame 2's slot intact
        state.restore(checkpoint)
        assert all(r is not None for r in state.stream().references)
        for i in range(3, 7):                                # frames 4 and 6 refresh: both slots rewritten
            tower(pixel_values=clip[i : i + 1])
        state.restore(checkpoint)
        assert state.stream().references == [None, None] and state.stream().frame_index == 3
        tower(pixel_values=clip[3:4])
        assert handle.stats.calls[-1].refresh_frames == (3,)  # selective by its index, but nothing to read


def test_frames_of_a_new_size_replace_the_slots_and_forget_the_graphs_that_read_them():
    tower = build_tiny_tower("siglip", num_hidden_layers=2)
    graphs = emulated(tower)
    frame_by_frame(tower, noisy_clip(4), GRAPHED)
    assert len(graphs._captured) == 4
    small = torch.nn.functional.interpolate(noisy_clip(4), size=(20, 20))  # 100 tokens instead of 225
    with stc.cacher_attached(tower, GRAPHED), torch.inference_mode():
        outputs = torch.cat([tower(pixel_values=small[i : i + 1], interpolate_pos_encoding=True).last_hidden_state
                             for i in range(4)])
    with stc.cacher_attached(tower, STREAM), torch.inference_mode():
        eager = torch.cat([tower(pixel_values=small[i : i + 1], interpolate_pos_encoding=True).last_hidden_state
                           for i in range(4)])
    assert torch.equal(outputs, eager)
    assert len(graphs._captured) == 4 and graphs.stats.captures == 8   # the first size's graphs are gone


def test_graphed_streams_keep_their_own_slots_and_equal_eager_bit_for_bit():
    """Three streams through one graphed tower: each stream writes its own reference slots, so a
    refresh frame of one stream never overwrites what another reads; a stream that leaves gives
    its slots back."""
    tower = build_tiny_tower("siglip", num_hidden_layers=2)
    clips = [noisy_clip(6, seed=s) for s in range(3)]
    calls = [[0, 1, 2], [0, 1, 2], [1, 0], [2, 2, 0], [1, 2]]

    def run(config):
        cursor, out = [0, 0, 0], []
        with stc.cacher_attached(tower, config) as handle, torch.inference_mode():
            for ids in calls:
                frames = []
                for sid in ids:
                    frames.append(clips[sid][cursor[sid]])
                    cursor[sid] += 1
                with handle.streams(ids):
                    out.append(tower(pixel_values=torch.stack(frames)).last_hidden_state)
            memory = handle.memory_bytes()
            handle.reset(1)
            left = handle.memory_bytes()
        return torch.cat(out), memory, left

    eager, eager_memory, _ = run(STREAM)
    graphs = emulated(tower)
    graphed, memory, left = run(GRAPHED)
    assert torch.equal(graphed, eager) and graphs.stats.replays > 0
    assert set(memory) == {0, 1, 2} and all(memory[s] == 2 * eager_memory[s] for s in memory)  # two slots each
    assert set(left) == {0, 2} and set(graphs.slot_bytes()) == {0, 2}
