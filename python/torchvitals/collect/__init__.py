"""Collection during training: the Monitor and the parts it delegates to."""
