"""cat_engine.bench"""
