"""Datasets: offline MNIST / Fashion-MNIST (:mod:`repro.data.mnist`) and user-provided CIFAR-10 / ImageNet
(:mod:`repro.data.paper_data`). Import the submodules directly; this package imports nothing heavy."""
