"""Token trees: their shape (``tree``), what calibration predicts of them (``walk``), which one a request gets
(``choice``) and what each costs on this device (``tuning``)."""
