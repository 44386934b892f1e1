"""Callbacks for training frameworks, each an optional extra that ``import torchvitals``
never imports: ``torchvitals.integrations.lightning`` (``pip install
torchvitals[lightning]``) and ``torchvitals.integrations.hf`` (``torchvitals[hf]``)."""
