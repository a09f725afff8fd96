"""MNIST-1D: generated offline with the package defaults, cached under ``$GUESSGRAD_CACHE``."""

from __future__ import annotations

import gc
import importlib
import os
import re
import socket
import stat
import warnings

import numpy as np
import pytest
import torch

import guessgrad

loader = importlib.import_module("guessgrad.data.mnist1d")  # the module, not the function


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One real generation into a fresh cache directory, then a cached read."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUESSGRAD_CACHE", str(cache))
        first = guessgrad.data.mnist1d()
        files = sorted(p.name for p in cache.iterdir())

        def refuse():
            raise AssertionError("the cache was not used")

        mp.setattr(loader, "_generate", refuse)
        second = guessgrad.data.mnist1d()
        as64 = guessgrad.data.mnist1d(dtype=torch.float64)
    return first, second, as64, files


def fake_arrays(n_train=8, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n_train, 40)),
        "y": rng.integers(0, 10, n_train),
        "x_test": rng.standard_normal((n_test, 40)),
        "y_test": rng.integers(0, 10, n_test),
    }


def test_shapes_and_types(generated):
    data = generated[0]
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert data.y_train.shape == (4000,) and data.y_test.shape == (1000,)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.y_test.dtype == torch.int64
    assert data.num_features == 40 and data.num_classes == 10
    assert set(data.y_train.tolist()) == set(range(10))
    assert set(data.y_test.tolist()) == set(range(10))
    assert torch.isfinite(data.x_train).all() and torch.isfinite(data.x_test).all()


def test_matches_the_reference_generation(generated):
    """The mnist1d package's defaults (seed 42) give these labels and values."""
    data = generated[0]
    assert torch.bincount(data.y_train).tolist() == [
        398,
        396,
        411,
        394,
        394,
        402,
        401,
        404,
        402,
        398,
    ]
    assert torch.bincount(data.y_test).tolist() == [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]
    assert data.y_train[:10].tolist() == [2, 6, 4, 5, 6, 6, 6, 0, 3, 1]
    assert data.y_test[:10].tolist() == [2, 6, 3, 9, 4, 3, 1, 9, 5, 2]
    expected = [-0.33200566736939013, -0.4719103656557236, -0.778697076293495, -1.0097408265367045]
    torch.testing.assert_close(
        data.x_train[0, :4].double(),
        torch.tensor(expected, dtype=torch.float64),
        rtol=1e-6,
        atol=1e-6,
    )
    assert float(data.x_train.double().abs().sum()) == pytest.approx(118338.2951, rel=1e-6)


def test_second_call_reads_the_cache(generated):
    first, second, as64, files = generated
    assert len(files) == 1 and files[0].startswith("mnist1d-") and files[0].endswith(".npz")
    for a, b in [
        (first.x_train, second.x_train),
        (first.y_train, second.y_train),
        (first.x_test, second.x_test),
        (first.y_test, second.y_test),
    ]:
        assert torch.equal(a, b)
    assert as64.x_train.dtype == torch.float64
    torch.testing.assert_close(as64.x_train.float(), first.x_train, rtol=0, atol=0)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("GUESSGRAD_CACHE", str(tmp_path / "here"))
    assert loader.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("GUESSGRAD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loader.cache_dir() == tmp_path / "xdg" / "guessgrad"
    # an empty GUESSGRAD_CACHE is unset, not the working directory; a relative XDG_CACHE_HOME
    # is ignored (XDG base directory specification)
    monkeypatch.setenv("GUESSGRAD_CACHE", "")
    assert loader.cache_dir() == tmp_path / "xdg" / "guessgrad"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert loader.cache_dir() == tmp_path / "home" / ".cache" / "guessgrad"


def test_generator_called_once_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("GUESSGRAD_CACHE", str(tmp_path))
    calls = []

    def fake():
        calls.append(1)
        return fake_arrays()

    monkeypatch.setattr(loader, "_generate", fake)
    a = guessgrad.data.mnist1d()
    b = guessgrad.data.mnist1d()
    assert len(calls) == 1
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert torch.equal(a.x_train, torch.as_tensor(fake_arrays()["x"], dtype=torch.float32))
    assert len(list(tmp_path.iterdir())) == 1  # the temporary file was renamed into place
    # another version of the mnist1d package may generate other data: a cache of its own
    monkeypatch.setattr(loader, "_package_version", lambda: "99.0")
    guessgrad.data.mnist1d()
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2
    # and other generator arguments (another seed, say) too
    import mnist1d.data

    real_args = mnist1d.data.get_dataset_args

    def other_seed(*args, **kwargs):
        out = real_args(*args, **kwargs)
        if isinstance(out, dict):
            return {**out, "seed": out["seed"] + 1}
        out.seed += 1
        return out

    monkeypatch.setattr(mnist1d.data, "get_dataset_args", other_seed)
    guessgrad.data.mnist1d()
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 3


def test_no_cache_never_touches_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("GUESSGRAD_CACHE", str(tmp_path / "unused"))
    calls = []

    def fake():
        calls.append(1)
        return fake_arrays()

    monkeypatch.setattr(loader, "_generate", fake)
    guessgrad.data.mnist1d(cache=False)
    guessgrad.data.mnist1d(cache=False)
    assert len(calls) == 2
    assert not (tmp_path / "unused").exists()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["not an npz", "truncated", "one byte flipped"])
def test_damaged_cache_file_is_regenerated(monkeypatch, tmp_path, damage):
    monkeypatch.setenv("GUESSGRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(loader, "_generate", fake_arrays)
    guessgrad.data.mnist1d()
    (path,) = tmp_path.iterdir()
    whole = path.read_bytes()
    if damage == "not an npz":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":  # an interrupted copy: a zip without its directory
        path.write_bytes(whole[: len(whole) // 2])
    else:  # a bad CRC in the first member's data
        flipped = bytearray(whole)
        flipped[len(whole) // 4] ^= 0xFF
        path.write_bytes(bytes(flipped))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # no file left open by the failed read
        data = guessgrad.data.mnist1d()
        gc.collect()
    assert torch.equal(data.y_train, torch.as_tensor(fake_arrays()["y"]))
    with np.load(path) as f:  # rewritten whole
        assert set(f.files) == {"x", "y", "x_test", "y_test"}


def test_to_device_keeps_everything():
    arrays = fake_arrays()
    data = loader.MNIST1D(*(torch.as_tensor(arrays[k]) for k in ("x", "y", "x_test", "y_test")))
    moved = data.to("cpu")
    assert torch.equal(moved.x_train, data.x_train) and torch.equal(moved.y_test, data.y_test)


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_data(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("GUESSGRAD_CACHE points below a file, so no folder can be made there")
    monkeypatch.setenv("GUESSGRAD_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(loader, "_generate", fake_arrays)
    with pytest.warns(UserWarning, match="could not write the MNIST-1D cache .*GUESSGRAD_CACHE"):
        data = guessgrad.data.mnist1d()
    assert torch.equal(data.y_train, torch.as_tensor(fake_arrays()["y"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    # the warning names the file in the way, whether it is the cache folder or above it
    for cache in (blocker, blocker / "cache"):
        monkeypatch.setenv("GUESSGRAD_CACHE", str(cache))
        with pytest.warns(UserWarning, match=re.escape(f"({blocker} is a file, not a folder)")):
            guessgrad.data.mnist1d()
    # a name the system refuses is a warning too, not an error that costs the data
    monkeypatch.setenv("GUESSGRAD_CACHE", str(tmp_path / ("x" * 300)))
    with pytest.warns(UserWarning, match="could not write the MNIST-1D cache .*too long"):
        data = guessgrad.data.mnist1d()
    assert torch.equal(data.y_train, torch.as_tensor(fake_arrays()["y"]))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_the_cache_file_is_readable_like_any_other(monkeypatch, tmp_path):
    """A cache folder shared by several users needs the umask's permissions."""
    monkeypatch.setenv("GUESSGRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(loader, "_generate", fake_arrays)
    previous = os.umask(0o022)
    try:
        guessgrad.data.mnist1d()
    finally:
        os.umask(previous)
    (path,) = tmp_path.iterdir()
    assert path.suffix == ".npz" and stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32"])
def test_a_dtype_that_is_not_floating_is_refused(dtype) -> None:
    with pytest.raises(TypeError, match="floating torch dtype"):
        guessgrad.data.mnist1d(dtype=dtype)
