"""handprop.analysis: what is made of finished runs.

``evaluate`` (metrics from predictions.csv, ensembles), ``compare`` (scikit-learn's
MLPClassifier on a run's own split), ``figures`` (matplotlib PNGs) and ``report`` (one
HTML page). scikit-learn and matplotlib are imported here and nowhere below.
"""
