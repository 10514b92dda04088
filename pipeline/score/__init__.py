"""Relevance scoring, composed like skglm: a datafit x a penalty, minimised by a solver over a feature matrix
(the contracts between them: pipeline/score/contracts.py)."""
from .cluster import ScoreRuntime
from .contracts import Datafit, Matrix, Penalty
from .datafit import MultinomialLogistic
from .matrix import FeatureMatrix
from .penalty import GroupL2Rows
from .relevance import open_matrix, relevance_key, score_path, score_store
from .solvers import FISTA, SOLVERS

__all__ = ["FISTA", "SOLVERS", "Datafit", "FeatureMatrix", "GroupL2Rows", "Matrix", "MultinomialLogistic", "Penalty",
           "ScoreRuntime", "open_matrix", "relevance_key", "score_path", "score_store"]
