"""The "model from code" of mdlm's MLflow pyfunc models (see :mod:`mdlm.mlflow_model`): MLflow runs this file
when it loads the model, instead of unpickling an object."""

from mlflow.models import set_model

from mdlm.mlflow_model import GeneratePyfunc

set_model(GeneratePyfunc())
