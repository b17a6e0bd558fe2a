"""feature_server.cuda: the primary context's scheduling flag, set through the CUDA driver API.

Without a GPU the driver is a stand-in compiled here (g++, as the HALS kernel test uses), which
records what it is given; the gpu test reads the real driver's flag after an Extractor on CUDA
has made its sessions."""

from __future__ import annotations

import ctypes

import pytest
from dff_protos.errors import InvalidInput

from feature_server import cuda
from tests.cuda_stand_in import compile_stand_in

STAND_IN = r"""
extern "C" {
static unsigned flags_[2] = {0x01u, 0x00u};
static int inits_ = 0;
int cuInit(unsigned f) { inits_++; return f == 0 ? 0 : 1; }
int cuDeviceGetCount(int* n) { *n = 2; return 0; }
int cuDeviceGet(int* d, int ordinal) { if (ordinal > 1) return 101; *d = ordinal + 10; return 0; }
int cuDevicePrimaryCtxGetState(int dev, unsigned* flags, int* active) {
    *flags = flags_[dev - 10] | 0x08u; *active = 0; return 0; }  /* 0x08: another flag, kept */
int cuDevicePrimaryCtxSetFlags_v2(int dev, unsigned flags) {
    if (dev == 11 && flags == 0x0Au) return 708;  /* device 1 refuses yield: reported */
    flags_[dev - 10] = flags; return 0; }
unsigned stub_flags(int i) { return flags_[i]; }
int stub_inits() { return inits_; }
}
"""


@pytest.fixture
def driver(tmp_path, monkeypatch) -> ctypes.CDLL:
    lib = compile_stand_in(STAND_IN, tmp_path, monkeypatch)
    monkeypatch.setattr(cuda, "_done", {})
    return lib


def test_block_is_the_default_and_other_flags_are_kept(driver, monkeypatch):
    monkeypatch.delenv("DFF_CUDA_SYNC", raising=False)
    assert cuda.sync_mode() == "block"
    assert cuda.set_sync_mode() == "device 0 set, device 1 set"
    assert driver.stub_flags(0) == 0x0C and driver.stub_flags(1) == 0x0C
    # once per process and mode
    assert cuda.set_sync_mode("block") == "device 0 set, device 1 set"
    assert driver.stub_inits() == 1


def test_modes_from_the_environment_and_refusals(driver, monkeypatch):
    monkeypatch.setenv("DFF_CUDA_SYNC", "spin")
    assert cuda.set_sync_mode() == "device 0 set, device 1 set"
    assert driver.stub_flags(0) == 0x09
    assert cuda.set_sync_mode("yield") == "device 0 set, device 1 failed (CUresult 708)"
    assert driver.stub_flags(0) == 0x0A and driver.stub_flags(1) == 0x09
    monkeypatch.setenv("DFF_CUDA_SYNC", "fast")
    with pytest.raises(InvalidInput, match="DFF_CUDA_SYNC='fast'"):
        cuda.sync_mode()
    with pytest.raises(InvalidInput, match="one of"):
        cuda.set_sync_mode("sleep")


def test_no_driver_is_no_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DFF_LIBCUDA", str(tmp_path / "missing.so"))
    monkeypatch.setattr(cuda, "_done", {})
    assert cuda.set_sync_mode("block") == "no CUDA driver here"


@pytest.mark.gpu
def test_an_extractor_on_cuda_blocks_while_it_waits(registry):
    import onnxruntime as ort

    from feature_server.extractor import Extractor

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs the CUDA execution provider")
    ex = Extractor(registry, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                   precisions=("fp16",))
    assert ex.execution_provider == "CUDAExecutionProvider"
    lib = ctypes.CDLL("libcuda.so.1")
    device, flags, active = ctypes.c_int(0), ctypes.c_uint(0), ctypes.c_int(0)
    assert lib.cuDeviceGet(ctypes.byref(device), 0) == 0
    assert lib.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags),
                                          ctypes.byref(active)) == 0
    assert active.value == 1 and flags.value & cuda.SCHED_MASK == cuda.SCHED_FLAGS["block"]

