"""The Severstal task's constants, in one place: the classes, how a catalog names their columns,
the CSV headers, and the side every model input must divide."""

CLASS_IDS = (1, 2, 3, 4)
N_CLASSES = len(CLASS_IDS)
RLE_COLUMNS = [f"rle_{c}" for c in CLASS_IDS]  # a catalog's RLE string per class
HAS_COLUMNS = [f"has_{c}" for c in CLASS_IDS]  # and whether the class is present

CURRENT_HEADER = ("ImageId", "ClassId", "EncodedPixels")
ORIGINAL_HEADER = ("ImageId_ClassId", "EncodedPixels")
SUBMISSION_HEADER = ("ImageId", "EncodedPixels", "ClassId")  # what predict writes

ENCODER_STRIDE = 32  # the U-Net's deepest stride: model inputs are padded to a multiple of it
