"""CIFAR model zoo."""
