"""The layout functions against every rule and worked example of docs/POSITIONS.md."""

import json
import subprocess
import sys

import pytest

from icae.core.positions import decoder_positions, encoder_positions, memory_positions, segment_spans, slot_positions


def test_segments_example():
    assert segment_spans(1300, 128, 4) == [(0, 434), (434, 434), (868, 432)]
    assert segment_spans(512, 128, 4) == [(0, 512)]
    assert segment_spans(513, 128, 4) == [(0, 257), (257, 256)]
    assert segment_spans(1, 128, 4) == [(0, 1)]


@pytest.mark.parametrize("length", [1, 7, 511, 512, 513, 1300, 5000])
def test_segments_cover_text(length):
    spans = segment_spans(length, 128, 4)
    assert sum(s for _, s in spans) == length
    assert all(o == sum(s for _, s in spans[:j]) for j, (o, _) in enumerate(spans))
    assert all(s <= 512 for _, s in spans)


@pytest.mark.parametrize(
    "seg_len, m, head, tail",
    [
        (512, 128, [2, 6, 10], [506, 510]),
        (300, 128, [2, 4, 6, 9, 11, 13, 16, 18], [295, 297, 299]),
        (100, 32, [2, 5, 8, 11, 15, 18, 21, 24], [93, 96, 99]),
        (510, 34, [8, 23, 38, 53], [473, 488, 503]),
        (7, 4, [1, 3, 5, 7], []),
        (5, 2, [2, 4], []),
        (128, 128, list(range(1, 129)), []),
        (74, 7, [6, 16, 27, 38, 48, 59, 69], []),
    ],
)
def test_epl_worked_examples(seg_len, m, head, tail):
    pos = memory_positions("epl", seg_len, m, 4)
    assert len(pos) == m
    assert pos[: len(head)] == head
    if tail:
        assert pos[-len(tail):] == tail


def test_epl_equals_seed_arange_formula():
    # The seed's own form: round(arange((c+1)/2, s+0.5, step=c)).
    import torch

    for seg_len, m in [(512, 128), (300, 128), (100, 32), (510, 34), (434, 128), (432, 128)]:
        c = seg_len / m
        seed = torch.round(torch.arange((c + 1) / 2, seg_len + 0.5, c, dtype=torch.float64))[:m].long().tolist()
        assert memory_positions("epl", seg_len, m, 4) == seed


def test_epl_lm_without_special_token_starts_at_L():
    # POSITIONS.md's worked example: L=512, m=128, no [LM]: the continuation runs 512, 513, ...
    pos = decoder_positions("epl", 512, 128, 4, "lm", 2, special_token=False)
    assert pos[126:] == [506, 510, 512, 513]
    with_token = decoder_positions("epl", 512, 128, 4, "lm", 2, special_token=True)
    assert with_token[126:] == [506, 510, 512, 513, 514]  # [LM] at 512, the continuation from 513
    assert decoder_positions("epl_fixed", 512, 128, 4, "lm", 2, special_token=False)[126:] == [506, 510, 512, 513]


def test_epl_centres_round_exactly_half_to_even():
    # Every centre ((2k+1)*s + m) / (2m) rounded half to even, against exact rational arithmetic.
    from fractions import Fraction

    def reference(s, m):  # Python's round() of a Fraction is exact and rounds half to even
        return [round(Fraction((2 * k + 1) * s + m, 2 * m)) for k in range(m)]

    for m in range(1, 161):
        for s in range(1, 601):
            assert memory_positions("epl", s, m, 4) == reference(s, m), (s, m)


def test_epl_512_is_every_fourth_from_two():
    assert memory_positions("epl", 512, 128, 4) == list(range(2, 511, 4))


def test_short_text_repeats_positions():
    pos = memory_positions("epl", 50, 128, 4)
    assert len(pos) == 128 and len(set(pos)) < 128 and min(pos) >= 1 and max(pos) <= 50


def test_multispan_offsets():
    slots = slot_positions("epl", 1300, 128, 4)
    assert len(slots) == 3 * 128
    assert slots[128] == 436  # segment 1: offset 434 + 2
    assert slots[:128] == memory_positions("epl", 434, 128, 4)
    assert slots[256:] == [868 + p for p in memory_positions("epl", 432, 128, 4)]
    enc = encoder_positions("epl", 434, 128, 4, offset=434)
    assert enc[:434] == list(range(435, 869)) and enc[434:] == slots[128:256]


def test_epl_fixed():
    assert memory_positions("epl_fixed", 512, 128, 4) == list(range(2, 511, 4))
    assert memory_positions("epl_fixed", 100, 128, 4) == list(range(2, 511, 4))  # beyond the text
    assert memory_positions("epl_fixed", 100, 4, 4, offset=10) == [12, 16, 20, 24]


def test_default_layout():
    assert encoder_positions("default", 10, 4, 4) == list(range(14))
    assert decoder_positions("default", 10, 4, 4, "ae", 11) == list(range(4 + 1 + 11))


def test_decoder_epl_tasks():
    slots = memory_positions("epl", 7, 4, 4)
    assert decoder_positions("epl", 7, 4, 4, "ae", 8) == slots + [0] + list(range(1, 9))
    assert decoder_positions("epl", 7, 4, 4, "lm", 3) == slots + [7, 8, 9, 10]
    assert decoder_positions("epl", 7, 4, 4, "lm", 3, special_token=False) == slots + [7, 8, 9]  # the seed's
    assert decoder_positions("epl", 7, 4, 4, "ft", 2) == slots + [7, 8, 9]
    assert decoder_positions("epl_fixed", 7, 4, 4, "ae", 2) == [2, 6, 10, 14, 0, 1, 2]


def test_layout_command_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "icae", "layout", "--layout", "epl", "--length", "300", "--mem_size", "128",
         "--task", "lm"],
        capture_output=True, text=True, check=True,
    ).stdout
    data = json.loads(out)
    seg = data["segments"][0]
    assert seg["memory_positions"][:8] == [2, 4, 6, 9, 11, 13, 16, 18]
    assert seg["encoder_positions"][:3] == [1, 2, 3]
    assert data["decoder"]["positions"][128:] == list(range(300, 309))


def test_layout_command_rejects_unknown_layout():
    proc = subprocess.run([sys.executable, "-m", "icae", "layout", "--layout", "nope", "--length", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown position layout 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_memory_and_slots_follow_the_text_and_count_from_zero():
    assert memory_positions("default", 10, 4, 4) == [10, 11, 12, 13]
    assert slot_positions("default", 1300, 128, 4) == list(range(3 * 128))  # 3 segments: 0 .. n*m-1
    assert decoder_positions("default", 1300, 128, 4, "lm", 5, special_token=False) == list(range(3 * 128 + 5))


def test_the_specs_refusals():
    from icae.core.positions import check_layout
    from icae.errors import UserError

    with pytest.raises(ValueError, match="at least one token"):
        segment_spans(0, 128, 4)
    with pytest.raises(ValueError, match="always has its \\[AE\\] token"):
        decoder_positions("epl", 7, 4, 4, "ae", 8, special_token=False)
    with pytest.raises(ValueError, match="unknown task"):
        decoder_positions("epl", 7, 4, 4, "qa", 3)
    with pytest.raises(UserError, match="unknown position layout 'sideways'"):
        check_layout("sideways")


def test_ids_past_the_vocabulary():
    """Memory tokens V..V+m-1, then [AE], [LM], [FT] (the spec's last rule), as the collator writes them."""
    from icae.core.collate import collate, token_id_layout

    assert token_id_layout(100, 4) == {"memory_token_ids": [100, 103], "ae_token_id": 104, "lm_token_id": 105,
                                       "ft_token_id": 106}
    batch = collate([dict(input_ids=[1, 2, 3], task="lm", target_ids=[5])], "epl", 4, 4, 100)
    assert batch["encoder_input_ids"][0].tolist() == [1, 2, 3, 100, 101, 102, 103]
    assert batch["decoder_input_ids"][0].tolist() == [100] * 4 + [105, 5]
