"""The network: TOOD's modules (ResNet, FPN, the T-head and its ops) and the model class that builds them
from a YAML."""
