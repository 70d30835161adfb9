"""The ragged-vs-padded dashboard of notebook 06: bytes it reports and how the sliders redraw it."""
import torch

from mor_lab.viz.kernels import RaggedDashboard, decode_kv_bytes, request_lengths


def test_decode_kv_bytes_counts_keys_and_values_to_the_longest_slot_or_each_own():
    padded, ragged = decode_kv_bytes(torch.tensor([1, 4, 0]), kv_heads=2, head_dim=8, bytes_per=2)
    per_position = 2 * 2 * 8 * 2
    assert (padded, ragged) == (per_position * 3 * 4, per_position * 5)


def test_request_lengths_stay_in_range_and_repeat_for_a_seed():
    lengths = request_lengths(32, 10, 20)
    assert lengths.min() >= 10 and lengths.max() <= 20 and torch.equal(lengths, request_lengths(32, 10, 20))


def test_ragged_dashboard_redraws_when_a_slider_moves():
    dash = RaggedDashboard(slots=16, shortest=20, longest=2048)
    title = dash.figure.layout.title.text
    dash.slots.value = 40
    assert len(dash.figure.data[1].y) == 40 and dash.figure.layout.title.text != title
    assert dash.update(8, 2048) == 1.0  # every request as long as the longest: nothing saved
    assert dash.update(8, 1) > 1.0
