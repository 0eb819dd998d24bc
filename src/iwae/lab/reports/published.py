"""The published numbers that reports sit beside ours.

Burda, Grosse and Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016, Tables 1 and 2 and Appendix D
(:data:`PUBLISHED_TABLE1`, :data:`PUBLISHED_TABLE2`), and Rainforth et al. (ICML 2018) for the other objectives
(:data:`PUBLISHED_RAINFORTH`), as transcribed, with their sources, in docs/references.md.
"""

from __future__ import annotations

SOURCE = "Burda, Grosse & Salakhutdinov (ICLR 2016), Tables 1 and 2 and Appendix D"
BURDA = "Burda, Grosse & Salakhutdinov (ICLR 2016)"

# (dataset, stochastic layers, k, objective) -> (test NLL in nats, active units per layer or None).
PUBLISHED_TABLE1: dict[tuple[str, int, int, str], tuple[float, tuple[int, ...] | None]] = {
    # MNIST, dynamic binarisation (Table 1)
    ("mnist", 1, 1, "vae"): (86.76, (19,)),
    ("mnist", 1, 1, "iwae"): (86.76, (19,)),
    ("mnist", 1, 5, "vae"): (86.47, (20,)),
    ("mnist", 1, 5, "iwae"): (85.54, (22,)),
    ("mnist", 1, 50, "vae"): (86.35, (20,)),
    ("mnist", 1, 50, "iwae"): (84.78, (25,)),
    ("mnist", 2, 1, "vae"): (85.33, (16, 5)),
    ("mnist", 2, 1, "iwae"): (85.33, (16, 5)),
    ("mnist", 2, 5, "vae"): (85.01, (17, 5)),
    ("mnist", 2, 5, "iwae"): (83.89, (21, 5)),
    ("mnist", 2, 50, "vae"): (84.78, (17, 5)),
    ("mnist", 2, 50, "iwae"): (82.90, (26, 7)),
    # OMNIGLOT (Table 1)
    ("omniglot", 1, 1, "vae"): (108.11, (28,)),
    ("omniglot", 1, 1, "iwae"): (108.11, (28,)),
    ("omniglot", 1, 5, "vae"): (107.62, (28,)),
    ("omniglot", 1, 5, "iwae"): (106.12, (34,)),
    ("omniglot", 1, 50, "vae"): (107.80, (28,)),
    ("omniglot", 1, 50, "iwae"): (104.67, (41,)),
    ("omniglot", 2, 1, "vae"): (107.58, (28, 4)),
    ("omniglot", 2, 1, "iwae"): (107.56, (30, 5)),
    ("omniglot", 2, 5, "vae"): (106.31, (30, 5)),
    ("omniglot", 2, 5, "iwae"): (104.79, (38, 6)),
    ("omniglot", 2, 50, "vae"): (106.30, (30, 5)),
    ("omniglot", 2, 50, "iwae"): (103.38, (44, 7)),
    # Fixed binarisation MNIST (Appendix D): NLL only
    ("mnist-fixed", 1, 1, "vae"): (88.71, None),
    ("mnist-fixed", 1, 5, "vae"): (88.83, None),
    ("mnist-fixed", 1, 50, "vae"): (89.05, None),
    ("mnist-fixed", 1, 1, "iwae"): (88.71, None),
    ("mnist-fixed", 1, 5, "iwae"): (87.63, None),
    ("mnist-fixed", 1, 50, "iwae"): (87.10, None),
    ("mnist-fixed", 2, 1, "vae"): (88.08, None),
    ("mnist-fixed", 2, 5, "vae"): (87.63, None),
    ("mnist-fixed", 2, 50, "vae"): (87.86, None),
    ("mnist-fixed", 2, 1, "iwae"): (88.08, None),
    ("mnist-fixed", 2, 5, "iwae"): (86.17, None),
    ("mnist-fixed", 2, 50, "iwae"): (85.32, None),
}

# Table 2 (MNIST, one layer; 2,187 further passes at 1e-4): (from objective, k) -> (to objective, k),
# with the base model's and the continued model's (NLL, active units).
PUBLISHED_TABLE2: dict[tuple[tuple[str, int], tuple[str, int]], dict[str, tuple[float, tuple[int, ...]]]] = {
    (("vae", 1), ("iwae", 50)): {"base": (86.76, (19,)), "continued": (84.88, (22,))},
    # The paper says "continued as a VAE" without a k; the authors' code (experiment2), which produced the number,
    # continues with k = 1.
    (("iwae", 50), ("vae", 1)): {"base": (84.78, (25,)), "continued": (86.02, (23,))},
}
BURDA_PASSES = 3280

# Rainforth et al. (ICML 2018), MNIST, one stochastic layer, 64 samples; unverified: taken from secondary sources
# (a reproduction's README and pythae's reproducibility notes; docs/references.md). (variant, estimator, k) -> test NLL.
RAINFORTH_SOURCE = "Rainforth et al. (ICML 2018), unverified: from secondary sources (docs/references.md)"
PUBLISHED_RAINFORTH: dict[tuple[str, str, int], float] = {
    ("iwae", "standard", 64): 84.52,
    ("miwae(M=8)", "standard", 64): 84.97,
    ("piwae(M=8)", "standard", 64): 84.46,
    ("ciwae(beta=0.05)", "standard", 64): 84.57,
    ("vae", "standard", 64): 86.21,
}

# A student reproduction (ReLU 784-200-200-50, minibatch 128, 100 passes over all 60,000 MNIST training images,
# Adam 1e-3; the preset student-full); unverified: from notes on the report, which name neither its authors nor its
# binarisation (docs/references.md). k -> (test NLL or None, active units by the per-unit KL or None).
STUDENT_SOURCE = "a student reproduction's report, unverified: from notes that do not name it (docs/references.md)"
PUBLISHED_STUDENT: dict[int, tuple[float | None, int | None]] = {
    1: (81.06, 15),
    50: (None, 35),
    100: (76.17, 30),
}

# Where each table's numbers come from, by the name results/<experiment>/experiment.json gives it ("published"); no
# page numbers: no page-numbered copy was checked (docs/references.md). The camel's numbers are a reproduction
# report's, recorded by iwae.studies.camel in each camel.json.
SOURCES: dict[str, str] = {
    "table1": f"{BURDA}, Table 1",
    "table2": f"{BURDA}, Table 2",
    "appendix-d": f"{BURDA}, Appendix D",
    "rainforth": RAINFORTH_SOURCE,
    "student": STUDENT_SOURCE,
    "camel": "a reproduction report of Burda et al. (secondary, as iwae camel records it in camel.json; "
    "docs/references.md)",
}


def table1_source(dataset: str) -> str:
    """Where :data:`PUBLISHED_TABLE1`'s numbers for ``dataset`` come from: Table 1, or Appendix D for fixed-binarisation
    MNIST."""
    return SOURCES["appendix-d" if dataset == "mnist-fixed" else "table1"]
