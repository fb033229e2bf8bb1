"""Build the Cython scheduler twin, or fall back to the pure-Python one.

Only ``ext_modules`` and the ``build_ext`` subclass live here; metadata is in
pyproject.toml. Knobs (environment variables):

- ``PGDURABLE_NATIVE=auto`` (default): build; on a compile failure warn and
  install the pure-Python scheduler only.
- ``PGDURABLE_NATIVE=required``: a compile failure fails the build (CI, release).
- ``PGDURABLE_NATIVE=off``: do not build the extension.
- ``PGDURABLE_NATIVE_DEBUG=1``: annotate HTML, line tracing, ``-O0 -g``.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

MODE = os.environ.get("PGDURABLE_NATIVE", "auto").lower()
DEBUG = os.environ.get("PGDURABLE_NATIVE_DEBUG", "") == "1"


def _extensions() -> list[object]:
    if MODE == "off":
        return []
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError as exc:  # pragma: no cover - depends on the build env
        if MODE == "required":
            raise
        print(f"pgdurable: Cython unavailable ({exc}); installing the pure-Python scheduler",
              file=sys.stderr)
        return []
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
    ext = Extension(
        "pgdurable.graph._sched_c",
        ["native/_sched_c.pyx"],
        define_macros=macros,
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O2"],
    )
    directives = {"language_level": "3", "embedsignature": True}
    if DEBUG:
        directives["linetrace"] = True
    return cythonize([ext], compiler_directives=directives, annotate=DEBUG, quiet=True)


class OptionalBuildExt(build_ext):
    """build_ext that tolerates a compile failure unless the build is ``required``."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if MODE == "required":
                raise
            print(f"pgdurable: native build failed ({exc}); using the pure-Python scheduler",
                  file=sys.stderr)

    def build_extension(self, ext: object) -> None:
        try:
            super().build_extension(ext)  # type: ignore[arg-type]
        except Exception as exc:
            if MODE == "required":
                raise
            print(f"pgdurable: native build of {ext} failed ({exc}); using pure Python",
                  file=sys.stderr)


setup(ext_modules=_extensions() if os.path.exists("native/_sched_c.pyx") else [],
      cmdclass={"build_ext": OptionalBuildExt})
