"""handprop.nn: layers, losses, the flat-vector network, init, optimizers, gradient checks.

NumPy and the standard library only on import (a test proves it); ``threads`` holds
BLAS to one thread per call through threadpoolctl, imported when first needed. The
split of a batch over threads and MPI ranks is :mod:`handprop.scale`. The layers
compute in the array namespace of the network's arrays (:mod:`handprop.nn.backend`):
NumPy by default; array-api-compat is imported only for other arrays (CuPy on a GPU,
array-api-strict in the tests). The elementwise formulas of the passes and the
optimizers' updates are written once in :mod:`handprop.nn.kernels`: their NumPy passes,
and the same formula as one CUDA kernel for CuPy; :mod:`handprop.nn.cuda` (imported on
a GPU only) captures passes as CUDA graphs.
"""

from handprop.nn import backend
from handprop.nn.activations import ACTIVATIONS, Identity, ReLU, Sigmoid, Tanh
from handprop.nn.batchnorm import BatchNorm
from handprop.nn.conv import AvgPool2D, Conv2D, MaxPool2D, col2im, im2col
from handprop.nn.gradcheck import gradcheck, gradcheck_layer, numeric_gradient, relative_error
from handprop.nn.init import INITIALIZERS
from handprop.nn.layers import Dense, Dropout, Flatten, ItemSpec, Layer, Setting
from handprop.nn.losses import LOSSES, Loss, MeanSquaredError, SoftmaxCrossEntropy, softmax
from handprop.nn.modelfile import load, save
from handprop.nn.network import Network
from handprop.nn.optim import GD, OPTIMIZERS, SGD, Adam, Momentum, Nesterov, Optimizer, RMSprop
from handprop.nn.params import ParamLayout, ParamSlot
from handprop.nn.passes import Pass
from handprop.nn.schedules import SCHEDULES, Schedule
from handprop.nn.spec import LAYERS
from handprop.nn.threads import get_threads, set_threads

__all__ = [
    "ACTIVATIONS",
    "GD",
    "INITIALIZERS",
    "LAYERS",
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "SGD",
    "Adam",
    "AvgPool2D",
    "BatchNorm",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "Identity",
    "ItemSpec",
    "Layer",
    "Loss",
    "MaxPool2D",
    "MeanSquaredError",
    "Momentum",
    "Nesterov",
    "Network",
    "Optimizer",
    "ParamLayout",
    "ParamSlot",
    "Pass",
    "RMSprop",
    "ReLU",
    "Schedule",
    "Setting",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "Tanh",
    "backend",
    "col2im",
    "get_threads",
    "gradcheck",
    "gradcheck_layer",
    "im2col",
    "load",
    "numeric_gradient",
    "relative_error",
    "save",
    "set_threads",
    "softmax",
]
