"""Downstream tasks on a pre-trained Toto: ``base`` is the framework (frozen / fine-tuned /
random-init trunk, the training loop, distributed, resume, metrics); see docs/framework.md."""
