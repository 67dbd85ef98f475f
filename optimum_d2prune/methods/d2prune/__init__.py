"""D²Prune: its options (`options`, no torch), the method (`method`), the q/k/v choice (`attention`) and the global
search (`search`)."""
