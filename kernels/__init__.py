"""cat_engine.kernels"""
