"""The trainer: tf.data input, the sparse autoencoder, tf.distribute training, exports."""

# The JSON file beside every SavedModel export (config, image shape, label names). Here,
# not in trainer/export.py, so that readers need not import TensorFlow to find it.
EXPORT_INFO = "sae_export.json"
