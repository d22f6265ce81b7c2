"""libnftables through ctypes: the ``nft`` command language, in process.

libnftables (``libnftables.so.1``, Debian/Ubuntu package ``libnftables1``,
installed with ``nftables``) is the library the ``nft`` tool is built on; its
C API takes the same command text and applies a whole buffer as one atomic
transaction.  The binding is the few calls Debian's ``python3-nftables`` makes
(that module lives in the system Python only), so the agent runs in any
virtualenv without a process per change.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from typing import Any

__all__ = ["Nft", "NftError", "NftUnavailable"]


class NftUnavailable(RuntimeError):
    """libnftables cannot be loaded."""


class NftError(RuntimeError):
    """nftables refused a command (the text is nft's own message)."""


class Nft:
    """One libnftables context; :meth:`run` is thread-safe."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise NftUnavailable(
                f"cannot load libnftables ({exc}); install nftables (apt install nftables)"
            ) from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()

    def run(self, commands: str, *, as_json: bool = False) -> str:
        """Apply *commands* (one transaction); return nft's output.

        :raises NftError: nothing was applied; the message is nft's.
        """
        with self._lock:
            self._lib.nft_ctx_output_set_flags(self._ctx, 1 << 4 if as_json else 0)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise NftError(err.strip() or f"nft failed (rc {rc})")
        return out

    def json(self, command: str) -> Any:
        out = self.run(command, as_json=True)
        return json.loads(out) if out.strip() else {}

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
