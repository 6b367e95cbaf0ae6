"""Start JAX on the hardware that is really attached, quietly.

The chip compilers are installed beside JAX so that a CPU machine can compile for a TPU slice or
an H100 node (kinoe_jax.aot). Left alone, every JAX process on such a machine would then try to
bring both runtimes up: the CUDA plugin logs a failed cuInit with a traceback, libtpu complains
about worker hostnames, and the CUDA libraries print "could not find cuda drivers" while JAX is
imported. `setup()`, called before JAX is imported, keeps a machine with no accelerator on the
CPU (unless JAX_PLATFORMS says otherwise), gives libtpu the settings it needs to describe a
slice without one, and drops those known lines; every other line still reaches stderr.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import threading

# Settings under which libtpu describes a slice (jax.experimental.topologies) on a machine
# without TPUs, instead of looking for a metadata server and worker hostnames.
TPU_COMPILE_ONLY_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5p-8",  # any valid name: only silences a startup warning
    # Nothing runs on a TPU here, so several compiling processes may share libtpu.
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}

# What the CUDA libraries print when JAX (or TensorFlow) loads them on a machine without an
# NVIDIA driver: only that there is no GPU, which such a machine knows.
CUDA_ABSENT_NOISE = (b"cudart_stub.cc", b"All log messages before absl::InitializeLog()",
                     b"failed call to cuInit")
# TensorFlow's import notice: it only reads text here, where oneDNN's rounding is irrelevant.
TF_IMPORT_NOISE = (b"oneDNN custom operations are on",)


def attached_accelerators() -> set[str]:
    """JAX platforms whose hardware this machine has ('cuda', 'tpu'), from the device nodes."""
    found = set()
    if glob.glob("/dev/nvidia[0-9]*"):
        found.add("cuda")
    # TPU v2-v5e expose /dev/accelN; v5p and v6e go through VFIO.
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        found.add("tpu")
    return found


@contextlib.contextmanager
def _drop_stderr_lines(patterns):
    """Filter the process's stderr file descriptor (native libraries write there directly)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not any(p in line for p in patterns):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer goes: the pump reads to the end and stops
        thread.join()
        os.close(saved)


def without_cuda_noise(extra: tuple[bytes, ...] = ()):
    """A context in which loading the CUDA libraries stays quiet where no GPU is attached
    (wrap TensorFlow's first import and device query with it); `extra`: more lines to drop."""
    if "cuda" in attached_accelerators():
        return _drop_stderr_lines(extra) if extra else contextlib.nullcontext()
    return _drop_stderr_lines(CUDA_ABSENT_NOISE + extra)


def setup(tensorflow: bool = True) -> set[str]:
    """Choose the platforms and import JAX quietly; returns the accelerators attached.

    Every entry point calls it first, before anything imports JAX. It only sets what the user has
    not set. With `tensorflow`, TensorFlow (which seqio uses) is imported too, with every GPU and
    TPU hidden from it, so that it never takes accelerator memory from JAX."""
    attached = attached_accelerators()
    if not attached and "JAX_PLATFORMS" not in os.environ and "JAX_PLATFORM_NAME" not in os.environ:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if "tpu" not in attached:
        for key, value in TPU_COMPILE_ONLY_ENV.items():
            os.environ.setdefault(key, value)
    if "jax" not in sys.modules:
        with without_cuda_noise():
            # Here and not above: the settings just made must be in place before JAX loads.
            import jax  # noqa: F401, PLC0415

            # Plugin discovery loads the CUDA libraries once more; backends are not started
            # here (jax.distributed.initialize must still come first on a multi-host run).
            from jax._src import xla_bridge  # noqa: PLC0415

            register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
            if register is not None:
                register()
    if tensorflow:
        hide_accelerators_from_tensorflow()
    return attached


def hide_accelerators_from_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with without_cuda_noise(TF_IMPORT_NOISE):
        import tensorflow as tf  # noqa: PLC0415 (loaded only when asked, after the platform is settled)

        try:
            tf.config.set_visible_devices([], "GPU")
            tf.config.set_visible_devices([], "TPU")
        except (RuntimeError, ValueError):  # already initialised, or no such device type
            pass


def mesh_platform() -> str:
    """'tpu', 'gpu' or 'cpu': the devices of the mesh being traced for (a compile-only TPU slice
    on a CPU host says 'tpu'), else JAX's default backend. Kernels are chosen by this."""
    import jax  # noqa: PLC0415 (this module is imported before setup(), so before JAX)

    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None) if mesh is not None and not mesh.empty else None
    return getattr(device, "platform", None) or jax.default_backend()
