"""Alert rules (pure, :mod:`.rules`) and their evaluation per analysed frame (:mod:`.engine`)."""
