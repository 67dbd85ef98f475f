"""Memory: the peak of a run as it happens (`measure`), and as modelled before it starts (`estimate`)."""
