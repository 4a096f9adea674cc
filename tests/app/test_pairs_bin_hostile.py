"""The insightface .bin reader against hostile and broken files: bounded work, errors that name the file."""
import pickle
import threading

import pytest
import torch

from gdrd_fast.data import load_pairs_bin, read_pairs_bin, restricted_loads, write_pairs_bin
from gdrd_fast.data.pairs_bin import UnsafePickleError


def _finishes(fn, seconds=20.0):
    """fn's exception (or None) if it returns within `seconds`; fails the test if it hangs."""
    outcome = []

    def run():
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


def test_self_referential_list_is_refused(tmp_path):
    images = [b"x"]
    images.append(images)
    path = tmp_path / "loop.bin"
    path.write_bytes(pickle.dumps((images, [True]), protocol=4))
    exc = _finishes(lambda: read_pairs_bin(path))
    assert isinstance(exc, UnsafePickleError) and str(path) in str(exc) and "reached" in str(exc)


def test_list_shared_2_to_the_40_ways_in_600_bytes(tmp_path):
    shared = [b"x", b"y"]
    for _ in range(40):
        shared = [shared, shared]
    path = tmp_path / "bomb.bin"
    path.write_bytes(pickle.dumps((shared, [True]), protocol=4))
    assert path.stat().st_size < 600
    exc = _finishes(lambda: read_pairs_bin(path), seconds=5.0)
    assert isinstance(exc, UnsafePickleError) and str(path) in str(exc)


@pytest.mark.parametrize("payload, what", [
    (b"\x80\x04]r\xff\xff\xff\x7f.", "memo index"),  # LONG_BINPUT 2^31-1: C's memo would take 16 GB
    (pickle.dumps({b"k": b"v"}, protocol=4), "dict"),
    (pickle.dumps({1, 2}, protocol=4), "set"),
    (pickle.dumps(([b"a", b"b"], [2.5]), protocol=2), "float"),
])
def test_opcodes_outside_bytes_lists_tuples_bools_are_refused(payload, what):
    exc = _finishes(lambda: restricted_loads(payload), seconds=5.0)
    assert isinstance(exc, UnsafePickleError) and what in str(exc)


def _good(tmp_path):
    path = tmp_path / "lfw.bin"
    write_pairs_bin(path, torch.rand(4, 3, 8, 8) * 2 - 1, [True, False])
    return path


@pytest.mark.parametrize("keep", [0, 1, 2, 10, 0.5, -2, -1])
def test_truncated_files_name_the_path(keep, tmp_path):
    data = _good(tmp_path).read_bytes()
    end = int(keep * len(data)) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path = tmp_path / "cut.bin"
    path.write_bytes(data[:end])
    with pytest.raises(ValueError, match="cut.bin") as info:
        load_pairs_bin(path, progress=False)
    assert "\n" not in str(info.value)


def test_undecodable_images_and_decoded_size_are_checked(tmp_path):
    path = tmp_path / "junk.bin"
    write_pairs_bin(path, [b"not an image", b"nor this"], [True])
    with pytest.raises(ValueError, match="junk.bin.*does not decode"):
        load_pairs_bin(path, progress=False)
    good = _good(tmp_path)
    assert load_pairs_bin(good, progress=False)[0].shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="lfw.bin.*max_decoded_bytes"):
        load_pairs_bin(good, progress=False, max_decoded_bytes=4 * 3 * 8 * 8 * 4 - 1)
    with pytest.raises(ValueError, match="lfw.bin.*max_bytes"):
        read_pairs_bin(good, max_bytes=10)
