def main(argv=None):
    print("efmuon")
