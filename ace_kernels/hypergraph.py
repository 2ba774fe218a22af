"""placeholder: being written"""
def ace_hypergraph(*a, **k): raise NotImplementedError
class ACEHypergraph: pass
