"""The hybrid recommender's algorithms (numpy, scipy, ``implicit``), free of the web service:
:mod:`.hybrid` fits and scores, :mod:`.evaluation` measures it offline on a synthetic community."""
